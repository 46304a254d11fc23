"""Speed as a target: the device's timing of block shapes (timing.py) and the planner (planner.py)."""
