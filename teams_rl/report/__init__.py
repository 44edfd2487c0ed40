"""Reports: the paper's tables beside ours, for one run (the `report` stage) or a whole sweep.

`python -m teams_rl.report DIR` renders a run dir, an artifact folder or a multirun directory.
"""
