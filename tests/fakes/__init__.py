"""In-process fakes of the services meshagent talks to, speaking their real protocols."""
