"""Looks at (or tampers with) an S3 bucket with boto3, as a second client for the tests.

The endpoint and credentials come from the environment (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION), e.g. scripts/s3-local.sh's.
KEY is always a whole key, as the listing prints it; --prefix only narrows the listing.

usage: s3_layout.py --bucket B [--prefix P]        prints {"objects": [{"key": K, "size": N}, ...]} sorted by key
       s3_layout.py --bucket B --get KEY           writes the object's bytes to stdout
       s3_layout.py --bucket B --put KEY FILE      overwrites the object with FILE's bytes
       s3_layout.py --bucket B --delete KEY        deletes the object
"""
import argparse, json, sys
import boto3

if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--bucket", required=True)
    parser.add_argument("--prefix", default="")
    action = parser.add_mutually_exclusive_group()
    action.add_argument("--get", metavar="KEY")
    action.add_argument("--put", nargs=2, metavar=("KEY", "FILE"))
    action.add_argument("--delete", metavar="KEY")
    args = parser.parse_args()
    s3 = boto3.client("s3")
    if args.get is not None:
        sys.stdout.buffer.write(s3.get_object(Bucket=args.bucket, Key=args.get)["Body"].read())
    elif args.put is not None:
        with open(args.put[1], "rb") as f:
            s3.put_object(Bucket=args.bucket, Key=args.put[0], Body=f.read())
    elif args.delete is not None:
        s3.delete_object(Bucket=args.bucket, Key=args.delete)
    else:
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=args.bucket, Prefix=args.prefix)
        objects = [{"key": o["Key"], "size": o["Size"]} for page in pages for o in page.get("Contents", [])]
        json.dump({"objects": sorted(objects, key=lambda o: o["key"])}, sys.stdout)
        print()
