"""What runs beside training, off its path: the Hub mirror (hub, its planner hub_plan and card hub_card), the
webhook notifier (messages: what each event says, to the webhook and the driver; notify: delivery), W&B
tracking and the validation actors. Imports core/ and relay_train; never run/ or ops/."""
