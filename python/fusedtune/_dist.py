"""torch.distributed helpers shared by the optimizers and regrowth (one place that reads process_group)."""
from __future__ import annotations


def sync_group(process_group, who: str):
    """(True, group) when `who` reduces over `group` (None: torch.distributed's default group), else
    (False, None): one process, torch.distributed not initialized, or process_group=None.
    process_group: "auto" (the default group where torch.distributed is initialized with more than one
    rank), a ProcessGroup, or None (no reduction)."""
    if process_group is None:
        return False, None
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized()):
        if isinstance(process_group, str) and process_group == "auto":
            return False, None
        raise RuntimeError(f"{who}: process_group is set but torch.distributed is not initialized")
    group = None if isinstance(process_group, str) and process_group == "auto" else process_group
    return dist.get_world_size(group) > 1, group
