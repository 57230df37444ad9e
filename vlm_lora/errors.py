"""The errors that mean "bad input", which the CLI prints as one clear message."""

from vlm_lora.adapters.peft_format import AdapterError
from vlm_lora.data.datasets import DataError
from vlm_lora.modeling import ModelPathError
from vlm_lora.planner import PlanError
from vlm_lora.recipe import RecipeError
from vlm_lora.train.setup import RunExistsError, TrainingError

USER_ERRORS = (AdapterError, DataError, ModelPathError, PlanError, RecipeError, RunExistsError, TrainingError)
