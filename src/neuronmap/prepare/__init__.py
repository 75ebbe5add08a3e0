"""The prepare stage (rules/prepare.smk): the model directory, relation files to prompts split by subject, translated prompts."""
