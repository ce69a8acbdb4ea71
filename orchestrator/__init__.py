"""Everything distributed, in rooms by purpose, each importing only the rooms below it:
core/ (storage, ledger, policies, cluster config) < services/ (Hub, webhooks, W&B, validation) < run/ (launch,
workers, steward, preemption) < ops/ (spot agent, supervisor, status) < cli.py. relay_train never imports this."""
