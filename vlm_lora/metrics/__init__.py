"""Caption metrics in pure Python, numerically equal to pycocoevalcap (no Java).

    from vlm_lora.metrics import score_captions
    score_captions(["A dog runs."], [["a dog is running", "the dog runs"]])
    # {'bleu1': ..., 'bleu2': ..., 'bleu3': ..., 'bleu4': ..., 'rougeL': ..., 'cider': ..., 'n': 1}

Scorers take tokenized strings and return ``(corpus_score, per_sample_scores)``
like pycocoevalcap's ``compute_score``; ``score_captions`` tokenizes first. Imports only the
standard library; no other part of vlm_lora.
"""

from vlm_lora.metrics.bleu import bleu
from vlm_lora.metrics.cider import cider_d
from vlm_lora.metrics.rouge import rouge_l
from vlm_lora.metrics.score import meteor_spice_available, score_captions, score_predictions_file, score_pretokenized
from vlm_lora.metrics.tokenizer import ptb_tokenize, ptb_tokenize_lines

__all__ = ["bleu", "cider_d", "meteor_spice_available", "ptb_tokenize", "ptb_tokenize_lines", "rouge_l",
           "score_captions", "score_predictions_file", "score_pretokenized"]
