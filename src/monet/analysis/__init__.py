"""Looking inside Monet: routing capture, the expert atlas, selection criteria."""

from monet.analysis.capture import ActiveExperts, RoutingCapture, active_experts, capture_routing

__all__ = ["ActiveExperts", "RoutingCapture", "active_experts", "capture_routing"]
