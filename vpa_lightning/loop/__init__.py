"""On-policy rounds (``vpa rounds``): sample with the current policy, rate, rank, train, evaluate, repeat.

Imports go one way: cli -> rounds -> collect / seva / data / cli (the fit) / export / eval.
"""
