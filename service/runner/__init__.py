"""The runners: the processes that hold the models, batch for every worker and run them."""
