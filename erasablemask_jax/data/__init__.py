"""Face datasets: TFDS builders (celeba_hq, ffhq, face_folder) written as array_record, read with grain."""
