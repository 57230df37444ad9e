"""The errors that mean "bad input", which the CLI prints as one clear message."""

from vlm_lora.adapter_io import AdapterError
from vlm_lora.data import DataError
from vlm_lora.planner import PlanError
from vlm_lora.recipe import RecipeError

USER_ERRORS = (AdapterError, DataError, PlanError, RecipeError)
