"""The suite's hooks (its own Ray cluster, run locks) for every item, tests and notebooks alike:
registered here once, where pytest finds them for both folders."""

pytest_plugins = ["tests._suite"]
