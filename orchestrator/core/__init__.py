"""The orchestrator's foundations: the run's storage, its ledger of events, the policies (pure decisions), the
one failure decision (failure.decide), the one background worker (background.Background), the cluster config
and secret redaction. Imports relay_train only: nothing from services/, run/ or ops/."""
