"""Harnesses that run main.py as a user does and check how it fails and recovers: bad inputs
and faults (bad_inputs.py), and kills at random moments with bit-identical resumes
(kill_resume.py). Each starts main.py through processes.py."""
