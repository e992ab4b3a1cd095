"""`specserve tune`: measure speculation settings on the user's prompts and recommend one."""
