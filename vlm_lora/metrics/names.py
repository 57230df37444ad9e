"""The tasks an eval scores and the metric names each reports: plain data, importable from any layer
(the recipe checks ``train.metric_for_best`` against it before anything loads)."""

TASKS = ("caption", "vqa", "choice")
TASK_METRICS = {"caption": ("bleu1", "bleu2", "bleu3", "bleu4", "rougeL", "cider"),
                "vqa": ("vqa_accuracy", "exact_match", "anls"), "choice": ("choice_accuracy",)}
DEFAULT_METRIC = {"caption": "cider", "vqa": "vqa_accuracy", "choice": "choice_accuracy"}  # also the report's
