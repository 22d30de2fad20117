"""Reading a scenario: fields with located errors, overrides, distributions, and the spec of each section."""
