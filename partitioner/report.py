"""Human-readable reports of a plan."""

from __future__ import annotations

from partitioner.make import PlanResult


def accuracy_measured(plan) -> bool:
    """True when the plan's accuracy figures were measured on validation data (exits or a learned codec were
    evaluated); False for random weights and for models planned without validation data."""
    if plan.model.random_weights:
        return False
    return bool(plan.exits or plan.learned_codecs or "validation_images" in plan.notes)


def accuracy_reason(plan) -> str:
    """Why a plan has no accuracy figures."""
    return "random weights" if plan.model.random_weights else "no validation data for this model"


def _leak(ssim: float | None) -> str:
    return "unknown" if ssim is None else f"{ssim:.3f}"


def split_table(result: PlanResult) -> str:
    """A table of every split with its estimate; the chosen one marked."""
    plan = result.plan
    joint = "head_variants" in plan.notes
    leak = any(e.leakage_ssim is not None for e in result.estimates)
    lines = [
        *([f"WARNING: {plan.model.name} has random weights: its answers are meaningless (timing only)"]
          if plan.model.random_weights else []),
        f"plan for {plan.model.name}: bandwidth {plan.notes['bandwidth_bps'] / 1e6:g} Mbit/s, "
        f"RTT {plan.notes['rtt_ms']:g} ms, edge = {plan.notes['device']} (x{plan.notes['edge_slowdown']:g} "
        f"this machine), splits considered: {plan.notes['splits_considered']}",
        "exits: " + (", ".join(f"boundary {e.boundary} threshold {e.threshold:.3f} "
                               f"(val exit rate {e.val_exit_rate:.1%})" for e in plan.exits) or "none"),
        "",
        f"{'split':>5} {'codec':>12} {'boundary shape':>16} {'payload B':>9} {'offload':>7} {'edge ms':>8} "
        f"{'xfer ms':>8} {'server ms':>9} {'E[lat] ms':>9}" + (f" {'leak SSIM':>9}" if leak else "") + "  exits"
        + ("   head variant, e2e bound" if joint else ""),
    ]
    for e in sorted(result.estimates, key=lambda e: (e.split, e.codec)):
        shape = "x".join(str(s) for s in plan.boundaries[e.split].shape)
        mark = " <- chosen" if (e.split, e.codec, e.exits) == (result.chosen.split, result.chosen.codec,
                                                               result.chosen.exits) else ""
        lines.append(f"{e.split:>5} {e.codec:>12} {shape:>16} {e.bytes_per_offload:>9} {e.offload_rate:>7.1%} "
                     f"{e.edge_ms:>8.2f} {e.transfer_ms:>8.2f} {e.server_ms:>9.2f} {e.expected_latency_ms:>9.2f}"
                     + (f" {_leak(e.leakage_ssim):>9}" if leak else "") + f"  {e.exits}"
                     + (f"   {e.head}, " + ("not judged" if e.disagreement_bound is None else
                                            f"<= {e.disagreement_bound:.4f}") if joint else "")
                     + mark)
    lines.append("")
    if joint:
        lines.append(f"head variants: {plan.notes['head_variants']}; chosen {plan.notes['head_variant']}")
        for key, why in sorted(plan.notes.items()):
            if key.startswith(("head_variant_", "rejected_")):
                lines.append(f"  {key}: {why}")
        cal = plan.exit_calibration
        if cal is not None:
            lines.append(f"certificate ({plan.notes['certificate']}): disagreement <= {cal.epsilon:g} with probability "
                         f">= {1 - cal.delta:g}; {cal.disagreements} of {cal.n_test} in the test part")
    if plan.head.kind != "fp32" or plan.head.notes:
        hn = plan.head.notes
        lines.append(f"edge head: {plan.head.kind}" + (f" (int8 measured x{hn['speedup']} vs fp32 here, validation "
                                                        f"drop {hn['validation_drop_points']} points"
                                                        + (f"; not used: {hn['rejected']}" if "rejected" in hn else "")
                                                        + ")" if "speedup" in hn else ""))
    for key, why in sorted(plan.notes.items()):  # learned_codec_<B>_rejected (learned_codec_rejected: older plans)
        if key.startswith("learned_codec_") and key.endswith("_rejected"):
            at = key[len("learned_codec_"):-len("_rejected")]
            lines.append(f"note: learned codec{f' at boundary {at}' if at else ''} not used: {why}")
    obj = plan.objective
    if obj:
        cons = ", ".join(f"{k} {v:g}" for k, v in obj.items() if k.startswith("max_")) or "none"
        lines.append(f"objective: {obj.get('objective', 'latency')}; constraints: {cons}; server load "
                     f"{obj.get('server_load_rps', 0):g} req/s")
    c = result.chosen
    energy = "" if c.expected_energy_j is None else f", {c.expected_energy_j * 1e3:.2f} mJ"
    accuracy = (f"est. accuracy drop {c.accuracy_drop_points or 0:.2f} points" if accuracy_measured(plan)
                else f"accuracy not measured ({accuracy_reason(plan)})")
    lines.append(f"chosen: split {c.split}, codec {c.codec}, exits {c.exits}"
                 + (f", head {c.head}" if joint else "") + f": {c.expected_latency_ms:.2f} ms"
                 f"{energy}, {c.expected_bytes or 0:.0f} B/request, {accuracy}")
    if result.pareto:
        lines.append(f"Pareto set (latency, energy, bytes, accuracy drop{', leakage' if leak else ''}): "
                     f"{len(result.pareto)} configurations")
        for e in result.pareto[:12]:
            en = "" if e.expected_energy_j is None else f" {e.expected_energy_j * 1e3:7.2f} mJ"
            drop = f"drop {e.accuracy_drop_points or 0:.2f}" if accuracy_measured(plan) else "drop not measured"
            lines.append(f"  split {e.split:>3} {e.codec:>12} exits {str(e.exits):<14} {e.expected_latency_ms:9.2f} ms"
                         f"{en} {e.expected_bytes or 0:9.0f} B  {drop}" + (f"  {e.head}" if joint else "")
                         + (f"  leakage SSIM {_leak(e.leakage_ssim)}" if leak else ""))
        if len(result.pareto) > 12:
            lines.append(f"  ... {len(result.pareto) - 12} more in plan.json")
    agreement = (f", validation agreement of the exits with the full model {result.validation_agreement:.4f}"
                 if plan.exits else "")
    lines.append(f"bundle written to {result.path} (split {result.chosen.split}, codec {result.chosen.codec}"
                 f"{agreement})")
    return "\n".join(lines)
