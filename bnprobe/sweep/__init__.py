"""`bnprobe sweep PLAN.toml`: plans (plan), their cost (cost), and running them (launch)."""
