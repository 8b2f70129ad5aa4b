"""The attention-method contract: one table of method cases (cases.py) and the tests over it."""
