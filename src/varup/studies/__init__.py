"""The studies that run trained models beyond Table 2: MC-Dropout uncertainty (uncertainty), editing (editing),
OOD detection (ood), the prompt study of the text-conditioned arm (prompts), and the λ study (lambdastudy)."""
