"""Model code: architectures, the Lightning module, the token DataModule and the planner
arrive with the training issue; the package exists now so the distribution layout is final."""
