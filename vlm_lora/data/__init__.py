"""Image-text data: file formats, data sets and the chat collator.

Owns everything between a data file on disk and a padded batch with labels: ``formats`` reads the
file formats into ``Sample``s, ``datasets`` turns them into a torch ``Dataset`` with images checked,
``collate`` renders conversations with the processor's chat template and masks all but the answers.
May import only the standard library, torch, PIL and transformers; nothing else of vlm_lora.
"""

from vlm_lora.data.collate import CaptionCollator, ChatCollator, build_prompt, make_collator
from vlm_lora.data.datasets import (DEFAULT_PROMPT, IGNORE_INDEX, CaptionDataset, CaptionExample, ConversationDataset,
                                    DataError, Problem, Sample, load_dataset, load_image)

__all__ = ["CaptionCollator", "CaptionDataset", "CaptionExample", "ChatCollator", "ConversationDataset", "DEFAULT_PROMPT",
           "DataError", "IGNORE_INDEX", "Problem", "Sample", "build_prompt", "load_dataset", "load_image", "make_collator"]
