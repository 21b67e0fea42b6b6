"""The controller: one long-lived daemon. APScheduler only ticks; durable state lives in the tables and
is rebuilt from them at start. Each tick runs small reconcilers (load rows, decide, apply); stack
operations and agent calls run in bounded pools and report back through the state."""
