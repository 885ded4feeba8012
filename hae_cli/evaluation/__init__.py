"""`hae eval`'s library: policies and budgets scored on a user's own data.

One module per responsibility: `records` (reading the data: JSONL / JSON, the `--samples`
folder, a `datasets` folder), `metrics` (VQA exact match, multiple choice, agreement with the
full cache), `matching` (settings, and the rule that runs each baseline at HAE's KV on the same
item), `runner` (one item under every setting, in a process that loaded the model once),
`store` (results appended as they finish, resumed after a stop), `parallel` (this process,
local processes, or Ray actors), `summary` (the table, the JSON, the equal-KV verdicts) and
`plot` (accuracy against KV cut).

No torch at import, in any of them but `runner`: the CLI reads the data and builds the plan
before the model loads.
"""
