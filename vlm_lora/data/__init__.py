"""Image-text data: file formats, sources, data sets, the chat collator and the loader.

Owns everything between data on disk and a padded batch with labels: ``formats`` reads the
file formats into ``Sample``s (``qa``: question and multiple-choice rows), ``sources`` parquet /
HF datasets / WebDataset shards, ``datasets`` turns them into a torch ``Dataset`` (or a shard
stream), ``collate`` renders conversations with the processor's chat template and masks all but
the answers, ``loader`` orders and loads the batches, ``pixels`` holds the pixel budgets of
dynamic-resolution processors, ``video_rows`` reads rows with videos and ``video`` samples their frames.
May import only the standard library, torch, PIL, transformers, datasets and pyarrow; nothing else of vlm_lora.
"""

from vlm_lora.data.collate import CaptionCollator, ChatCollator, make_collator
from vlm_lora.data.processors import build_prompt
from vlm_lora.data.datasets import (DEFAULT_PROMPT, IGNORE_INDEX, CaptionDataset, CaptionExample, ConversationDataset,
                                    DataError, Problem, Sample, load_dataset, load_image)

__all__ = ["CaptionCollator", "CaptionDataset", "CaptionExample", "ChatCollator", "ConversationDataset", "DEFAULT_PROMPT",
           "DataError", "IGNORE_INDEX", "Problem", "Sample", "build_prompt", "load_dataset", "load_image", "make_collator"]
