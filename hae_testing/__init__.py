"""What the tests, benchmarks and trainers build, kept out of the runtime: random checkpoints
written in each family's own hub layout (`checkpoints/`), and the easy-VQA and conversation
data the demo model is trained and measured on (`data/`). `hae_cli` never imports it."""
