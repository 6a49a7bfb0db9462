"""Run the student over prepared traces: windows, packing, log-probs, ranks and metrics (no Ray)."""
