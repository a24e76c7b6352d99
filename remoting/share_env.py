"""The names of the variables a share's processes get: the contract between the gateway,
which sets them (gateway/share_env.py), and the code that runs in a share and reads them
(the widget, the %bitfusion magic, the frameworks' caps in share_site)."""

SHARE_ID = "BITFUSION_SHARE_ID"
SERVER = "BITFUSION_SERVER"
GPU_INDICES = "BITFUSION_GPU_INDICES"
GPU_UUIDS = "BITFUSION_GPU_UUIDS"
MEMORY_MIB = "BITFUSION_MEMORY_MIB"  # per GPU; absent for whole GPUs
GPU_MEMORY_TOTAL_MIB = "BITFUSION_GPU_MEMORY_TOTAL_MIB"
SIMULATED = "BITFUSION_SIMULATED"  # "1" on a simulated pool
KERNEL_ID = "BITFUSION_KERNEL_ID"  # only in kernels: they have a shim to ask
USAGE_FILE = "BITFUSION_USAGE_FILE"  # the share's live usage, JSON (gateway/usage_files.py)
FILES = "BITFUSION_FILES"  # the client's folder, at the same path, when one is carried
