"""The wire contract between edge and server, independent of protobuf.

Open Inference Protocol v2 over gRPC. One model per bundle, named after ``plan.model.name``.

Split inference — input tensor ``features``: datatype ``UINT8``, shape ``[payload_bytes]``, the codec payload
in ``raw_input_contents[0]``. Request parameters: ``split`` (int64, the boundary index), ``codec`` (string,
codec name) and the codec's meta as ``codec.<key>`` entries (e.g. ``codec.shape = "1,48,14,14"``).

Cloud-only — input tensor ``input``: datatype ``FP32``, shape ``[B, *plan.input.shape]``, normalised like
``plan.input`` says; raw little-endian bytes or ``fp32_contents``.

Response — output tensor ``logits``: ``FP32`` ``[B, num_classes]`` in ``raw_output_contents[0]``;
response parameters ``server_queue_ms`` and ``server_compute_ms`` (doubles).
"""

FEATURES_TENSOR = "features"
INPUT_TENSOR = "input"
OUTPUT_TENSOR = "logits"
PARAM_SPLIT = "split"
PARAM_CODEC = "codec"
CODEC_META_PREFIX = "codec."
PARAM_TIMEOUT_US = "timeout"  # Triton's per-request timeout (int64 microseconds), used on streams
PARAM_QUEUE_MS = "server_queue_ms"
PARAM_COMPUTE_MS = "server_compute_ms"
MODEL_VERSION = "1"
DEFAULT_MAX_MESSAGE_BYTES = 16 * 1024 * 1024
# Link probes (`plan probe`, the edge agent) send ModelInfer requests to this model name. A server answers
# only once the whole message arrived, so the call times the transfer: ours answers OK with no outputs and
# counts the call as a link probe (splitinfer_server_link_probes_total), never as a failed inference; any
# other OIP server answers NOT_FOUND, which probes accept too.
PROBE_MODEL = "__splitinfer_link_probe__"
