"""Caption metrics in pure Python, numerically equal to pycocoevalcap (no Java).

    from vlm_lora.metrics import score_captions
    score_captions(["A dog runs."], [["a dog is running", "the dog runs"]])
    # {'bleu1': ..., 'bleu2': ..., 'bleu3': ..., 'bleu4': ..., 'rougeL': ..., 'cider': ..., 'n': 1}

Answer metrics for question answering (``vqa``: VQAv2 accuracy and exact match with the official
answer normalization; ``anls``: DocVQA's ANLS; ``choice``: multiple-choice accuracy from free-form
replies) return ``(mean, per_sample_scores)`` of raw strings.

Caption scorers take tokenized strings and return ``(corpus_score, per_sample_scores)``
like pycocoevalcap's ``compute_score``; ``score_captions`` tokenizes first. Imports only the
standard library; no other part of vlm_lora.
"""

from vlm_lora.metrics.anls import anls
from vlm_lora.metrics.bleu import bleu
from vlm_lora.metrics.choice import choice_accuracy, extract_choice
from vlm_lora.metrics.cider import cider_d
from vlm_lora.metrics.rouge import rouge_l
from vlm_lora.metrics.score import meteor_spice_available, score_captions, score_predictions_file, score_pretokenized
from vlm_lora.metrics.tokenizer import ptb_tokenize, ptb_tokenize_lines
from vlm_lora.metrics.vqa import exact_match, normalize_answer, vqa_accuracy

__all__ = ["anls", "bleu", "choice_accuracy", "cider_d", "exact_match", "extract_choice", "normalize_answer",
           "vqa_accuracy", "meteor_spice_available", "ptb_tokenize", "ptb_tokenize_lines", "rouge_l",
           "score_captions", "score_predictions_file", "score_pretokenized"]
