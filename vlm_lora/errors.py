"""The errors that mean "bad input", which the CLI prints as one clear message."""

from vlm_lora.adapter_io import AdapterError
from vlm_lora.data import DataError
from vlm_lora.planner import PlanError
from vlm_lora.recipe import RecipeError
from vlm_lora.run_setup import RunExistsError, TrainingError

USER_ERRORS = (AdapterError, DataError, PlanError, RecipeError, RunExistsError, TrainingError)
