"""Real data the demo model is trained and measured on (easy-VQA), and the conversations built from it."""
