"""Human-readable reports of a plan."""

from __future__ import annotations

from partitioner.make import PlanResult


def split_table(result: PlanResult) -> str:
    """A table of every split with its estimate; the chosen one marked."""
    plan = result.plan
    lines = [
        f"plan for {plan.model.name}: bandwidth {plan.notes['bandwidth_bps'] / 1e6:g} Mbit/s, "
        f"RTT {plan.notes['rtt_ms']:g} ms, edge = {plan.notes['device']} (x{plan.notes['edge_slowdown']:g} "
        f"this machine), splits considered: {plan.notes['splits_considered']}",
        "exits: " + ", ".join(f"boundary {e.boundary} threshold {e.threshold:.3f} (val exit rate {e.val_exit_rate:.1%})"
                              for e in plan.exits),
        "",
        f"{'split':>5} {'codec':>12} {'boundary shape':>16} {'payload B':>9} {'offload':>7} {'edge ms':>8} "
        f"{'xfer ms':>8} {'server ms':>9} {'E[lat] ms':>9}  exits",
    ]
    for e in sorted(result.estimates, key=lambda e: (e.split, e.codec)):
        shape = "x".join(str(s) for s in plan.boundaries[e.split].shape)
        mark = " <- chosen" if (e.split, e.codec) == (result.chosen.split, result.chosen.codec) else ""
        lines.append(f"{e.split:>5} {e.codec:>12} {shape:>16} {e.bytes_per_offload:>9} {e.offload_rate:>7.1%} "
                     f"{e.edge_ms:>8.2f} {e.transfer_ms:>8.2f} {e.server_ms:>9.2f} {e.expected_latency_ms:>9.2f}  "
                     f"{e.exits}{mark}")
    lines.append("")
    if plan.head.kind != "fp32" or plan.head.notes:
        hn = plan.head.notes
        lines.append(f"edge head: {plan.head.kind}" + (f" (int8 measured x{hn['speedup']} vs fp32 here, validation "
                                                        f"drop {hn['validation_drop_points']} points"
                                                        + (f"; not used: {hn['rejected']}" if "rejected" in hn else "")
                                                        + ")" if "speedup" in hn else ""))
    if "learned_codec_rejected" in plan.notes:
        lines.append(f"note: learned codec not used: {plan.notes['learned_codec_rejected']}")
    overall = min(result.estimates, key=lambda e: (e.expected_latency_ms, e.split))
    if overall.split != result.chosen.split:
        kind = {0: " (cloud-only)", len(result.estimates) - 1: " (edge-only)"}.get(overall.split, "")
        lines.append(f"note: split {overall.split}{kind} would be faster ({overall.expected_latency_ms:.2f} ms) but "
                     f"is outside the splits considered ({plan.notes['splits_considered']})")
    lines.append(f"bundle written to {result.path} (split {result.chosen.split}, codec {result.chosen.codec}, "
                 f"validation agreement of the exits with the full "
                 f"model {result.validation_agreement:.4f})")
    return "\n".join(lines)
