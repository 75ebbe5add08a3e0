"""Numbers that several stages compute alike, on the ground floor: the expertise measures (AP and
separation), the paired significance tests, and seeded draws that depend only on what they are for."""
