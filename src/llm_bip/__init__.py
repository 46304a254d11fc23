"""llm-bip: structured pruning of LLMs with the LLM-BIP block-output importance metric."""
