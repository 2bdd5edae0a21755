"""F5 BIG-IP AFM backend family: AFM JSON renderer, iControl REST client, credential store."""
