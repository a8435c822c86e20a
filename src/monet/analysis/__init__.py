"""Looking inside Monet: routing capture, the expert atlas, selection criteria."""

from monet.analysis.capture import ActiveExperts, RoutingCapture, active_experts, capture_routing
from monet.analysis.query import Atlas

__all__ = ["ActiveExperts", "Atlas", "RoutingCapture", "active_experts", "capture_routing"]
