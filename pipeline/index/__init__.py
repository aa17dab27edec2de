"""The index stage: plan, map (one worker per device), top-k, reduce, run and reindex."""
