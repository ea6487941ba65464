-- Attempt metadata (step.attempt.set_metadata): JSON a step attached to one attempt (an LLM
-- call's model and token counts), kept with the step's row (its final attempt) and with
-- every retried attempt. Not an output: dropping step outputs (preserve_steps=False) keeps it.
-- Stored as text, as outputs are: storage sees opaque JSON.
ALTER TABLE durably_steps ADD COLUMN metadata TEXT;
ALTER TABLE durably_step_attempts ADD COLUMN metadata TEXT;
