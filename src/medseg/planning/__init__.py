"""Dataset fingerprint and the editable JSON plan."""

from medseg.planning.fingerprint import ChannelStats, Fingerprint, compute_fingerprint
from medseg.planning.plan import ChannelNormalization, NetworkPlan, Plan, make_plan, read_plan
from medseg.planning.work_dir import fingerprint_dataset, plan_dataset, plan_for

__all__ = [
    "ChannelNormalization",
    "ChannelStats",
    "Fingerprint",
    "NetworkPlan",
    "Plan",
    "compute_fingerprint",
    "fingerprint_dataset",
    "make_plan",
    "plan_dataset",
    "plan_for",
    "read_plan",
]
