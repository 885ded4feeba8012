"""Real data the demo model is trained and measured on."""
