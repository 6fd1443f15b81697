"""Dataset fingerprint and the editable JSON plan."""

from medseg.planning.fingerprint import ChannelStats, Fingerprint, compute_fingerprint
from medseg.planning.plan import ChannelNormalization, NetworkPlan, Plan, make_plan, read_plan

__all__ = [
    "ChannelNormalization",
    "ChannelStats",
    "Fingerprint",
    "NetworkPlan",
    "Plan",
    "compute_fingerprint",
    "make_plan",
    "read_plan",
]
