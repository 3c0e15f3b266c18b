"""A mini-batch's Linear layer split into its images: the features, contributions and labels of each member."""
