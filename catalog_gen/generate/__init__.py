"""Stage 3, the nightly batch generator: the SKU sheet, prompts, the shared-batch planner and the run.
"""
