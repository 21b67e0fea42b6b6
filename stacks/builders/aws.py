"""AWS nodes: one EC2 instance per node, booted with the node agent (imports pulumi_aws).

Per node: an `aws.ec2.Instance` (spot: a one-time spot request that terminates on interruption),
root volume of `disk_size` GiB, an AMI looked up per region (Deep Learning Base for GPU nodes,
Ubuntu 22.04 otherwise; `spec.image` overrides) and gzip-compressed cloud-init user data that
installs the agent; the token is in that user data, which is a secret Output.

Network: by default the region's default VPC with one security group per cluster that admits the
agent port from `controller_cidr` (else from the VPC's own CIDR) and nothing else inbound. With
`network_stack`, the subnet and security group(s) come from that stack's outputs (`subnetId`,
`securityGroupId` unless `network_outputs` says otherwise) and Sortie makes no security group.

Identity (issue 17): nodes never get the controller's credentials. `spec.instance_profile` (config
`cloud.node_instance_profile`) is attached as is when set. Otherwise, when the nodes do S3 work
(`spec.node_buckets`), the cluster gets its own IAM role (trusted by EC2 only), an inline policy allowing
`s3:ListBucket` on exactly those buckets and `s3:GetObject`/`s3:PutObject` on exactly their objects (under the
prefix a URL names, else the whole bucket's objects: `arn:aws:s3:::b/*`), and an instance profile of that role on
every node: all three are resources of the cluster's stack, so they go with it.
"""

from __future__ import annotations

import base64
import gzip
import json
import re

import pulumi
import pulumi_aws as aws

from orchestrator.errors import UsageError
from orchestrator.policy.cloud_features import disk_settings
from stacks.builders import (
    DEFAULT_DISK_GB,
    BuiltNode,
    CloudNode,
    accelerator,
    agent_url,
    inbound_rules,
    location,
    merge_opts,
    network_output_names,
    secret_boot_script,
    sortie_tags,
)
from stacks.spec import ClusterSpec

DEFAULT_INSTANCE_TYPE = "m6i.xlarge"
NETWORK_OUTPUTS = {"subnet": "subnetId", "security_group": "securityGroupId"}
USER_DATA_LIMIT = 16 * 1024  # what EC2 takes, before base64
# (owner, name pattern) of the default images; `{arch}` is x86_64 or arm64.
GPU_AMI = ("amazon", "Deep Learning Base OSS Nvidia Driver GPU AMI (Ubuntu 22.04) *")
CPU_AMI = ("099720109477", "ubuntu/images/hvm-ssd/ubuntu-jammy-22.04-{arch}-server-*")
SSH_USER = "ubuntu"  # both default images are Ubuntu
GPU_INSTANCE_TYPES: dict[str, dict[int, str]] = {
    "T4": {1: "g4dn.xlarge", 4: "g4dn.12xlarge", 8: "g4dn.metal"},
    "A10G": {1: "g5.xlarge", 4: "g5.12xlarge", 8: "g5.48xlarge"},
    "L4": {1: "g6.xlarge", 4: "g6.12xlarge", 8: "g6.48xlarge"},
    "L40S": {1: "g6e.xlarge", 4: "g6e.12xlarge", 8: "g6e.48xlarge"},
    "V100": {1: "p3.2xlarge", 4: "p3.8xlarge", 8: "p3.16xlarge"},
    "A100": {8: "p4d.24xlarge"},
    "A100-80GB": {8: "p4de.24xlarge"},
    "H100": {8: "p5.48xlarge"},
}


def instance_type(spec: ClusterSpec) -> str:
    if spec.instance_type:
        return spec.instance_type
    acc = accelerator(spec)
    if acc is None:
        return DEFAULT_INSTANCE_TYPE
    name, count = acc
    found = GPU_INSTANCE_TYPES.get(name.upper(), {}).get(count)
    if found is None:
        raise UsageError(f"cluster {spec.name}: no default AWS instance type for {name}:{count}; set instance_type")
    return found


def is_arm(itype: str) -> bool:
    """Graviton families (m7g, c6gn, t4g, g5g, ...) take arm64 images."""
    match = re.match(r"^[a-z]+\d+([a-z-]*)\.", itype)
    return bool(match and "g" in match.group(1))


def default_ami(spec: ClusterSpec, itype: str, region: str | None, invoke: pulumi.InvokeOptions) -> pulumi.Output[str]:
    gpu = accelerator(spec) is not None
    owner, pattern = GPU_AMI if gpu else CPU_AMI
    name = pattern.format(arch="arm64" if is_arm(itype) else "amd64")
    image = aws.ec2.get_ami_output(
        most_recent=True, owners=[owner], region=region,
        filters=[{"name": "name", "values": [name]}, {"name": "state", "values": ["available"]},
                 {"name": "architecture", "values": ["arm64" if is_arm(itype) else "x86_64"]}],
        opts=invoke,
    )
    return image.id


def user_data_base64(script: str) -> str:
    """The boot script gzip-compressed (cloud-init unpacks it) and base64-encoded, within EC2's limit."""
    packed = gzip.compress(script.encode(), mtime=0)
    if len(packed) > USER_DATA_LIMIT:
        raise UsageError(f"the node boot script is {len(packed)} bytes compressed; EC2 takes {USER_DATA_LIMIT}")
    return base64.b64encode(packed).decode()


def build_aws_nodes(spec: ClusterSpec, opts: pulumi.ResourceOptions | None = None) -> list[BuiltNode]:
    region, zone = location(spec, "aws")
    itype = instance_type(spec)
    tags = sortie_tags(spec)
    base = merge_opts(opts)
    invoke = pulumi.InvokeOptions(parent=base.parent)
    subnet_id: pulumi.Input[str] | None = None
    if spec.network_stack:
        names = network_output_names(spec, NETWORK_OUTPUTS)
        network = pulumi.StackReference(f"{spec.name}-network", stack_name=spec.network_stack, opts=base)
        subnet_id = network.require_output(names["subnet"]).apply(_first)
        group_ids: pulumi.Input[list[str]] = network.require_output(names["security_group"]).apply(_as_list)
    else:
        vpc = aws.ec2.get_vpc_output(default=True, region=region, opts=invoke)
        if zone:
            subnet_id = aws.ec2.get_subnet_output(default_for_az=True, availability_zone=zone, vpc_id=vpc.id,
                                                  region=region, opts=invoke).id
        ingress: list[dict[str, object]] = [
            {"protocol": "tcp", "from_port": rule.low, "to_port": rule.high,
             "cidr_blocks": [rule.source] if rule.source is not None else [vpc.cidr_block],
             "description": rule.description} for rule in inbound_rules(spec)]
        group = aws.ec2.SecurityGroup(
            f"{spec.name}-agent", vpc_id=vpc.id, region=region,
            description=f"Sortie cluster {spec.name}: the node agent port (and SSH on the controller) only",
            ingress=ingress,
            egress=[{"protocol": "-1", "from_port": 0, "to_port": 0, "cidr_blocks": ["0.0.0.0/0"],
                     "ipv6_cidr_blocks": ["::/0"], "description": "all outbound"}],
            tags={**tags, "Name": f"{spec.name}-agent"}, opts=base,
        )
        group_ids = [group.id]
    key_name: pulumi.Input[str] | None = None
    if spec.ssh_public_key:
        key_name = aws.ec2.KeyPair(f"{spec.name}-key", public_key=spec.ssh_public_key, region=region,
                                   tags=tags, opts=base).key_name
    ami: pulumi.Input[str] = spec.image or default_ami(spec, itype, region, invoke)
    root_disk: dict[str, object] = {"volume_size": spec.disk_size or DEFAULT_DISK_GB, "volume_type": "gp3",
                                    "delete_on_termination": True, "encrypted": True}
    root_disk.update(disk_settings("aws", spec.disk_tier, spec.disk_size or DEFAULT_DISK_GB) or {})
    placement_group: pulumi.Input[str] | None = None
    if spec.network_tier == "best":  # EFA-class instances, close together
        placement_group = aws.ec2.PlacementGroup(f"{spec.name}-pg", strategy="cluster", region=region, tags=tags,
                                                 opts=base).id  # a placement group's id is its name
    market = ({"market_type": "spot",
               "spot_options": {"spot_instance_type": "one-time", "instance_interruption_behavior": "terminate"}}
              if spec.use_spot else None)
    profile: pulumi.Input[str] | None = None
    if spec.role == "node":
        profile = spec.instance_profile or bucket_instance_profile(spec, tags, base)
    nodes: list[BuiltNode] = []
    for rank in range(spec.num_nodes):
        name = f"{spec.name}-node-{rank}"
        instance = aws.ec2.Instance(
            name,
            ami=ami, instance_type=itype, region=region, availability_zone=zone if subnet_id is None else None,
            subnet_id=subnet_id, vpc_security_group_ids=group_ids, key_name=key_name,
            instance_market_options=market, placement_group=placement_group,
            root_block_device=root_disk,
            metadata_options={"http_tokens": "required", "http_endpoint": "enabled"},
            iam_instance_profile=profile,
            user_data_base64=secret_boot_script(spec, rank).apply(user_data_base64),
            tags={**tags, "Name": name, "sortie-rank": str(rank)},
            volume_tags={**tags, "Name": name, "sortie-rank": str(rank)},
            # The agent a node booted with stays until the node goes: never stop a node to change it.
            opts=merge_opts(base, additional_secret_outputs=["userData", "userDataBase64"],
                            ignore_changes=["userData", "userDataBase64"]),
        )
        nodes.append(CloudNode(
            rank=rank, node_id=instance.id, host=instance.private_ip, ip=instance.private_ip,
            url=agent_url(instance.private_ip, spec.agent_port),
            region=pulumi.Output.from_input(region) if region else instance.region,
            zone=instance.availability_zone, instance_type=pulumi.Output.from_input(itype), spot=spec.use_spot,
            public_ip=instance.public_ip.apply(lambda ip: ip or None), ssh_user=SSH_USER,
        ))
    return nodes


EC2_TRUST = {"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]}


def _bucket_and_prefix(url: str) -> tuple[str, str]:
    """`s3://bucket/some/prefix/` -> ("bucket", "some/prefix"); UsageError for anything else."""
    match = re.fullmatch(r"s3://([a-z0-9][a-z0-9.-]{1,61}[a-z0-9])(?:/(.*))?", url)
    if not match or "*" in url or "?" in url:
        raise UsageError(f"cluster bucket {url!r}: expected s3://<bucket>[/<prefix>] without wildcards")
    return match.group(1), (match.group(2) or "").strip("/")


def bucket_policy(buckets: tuple[str, ...] | list[str]) -> dict[str, object]:
    """The nodes' IAM policy: list exactly these buckets, get and put exactly their objects (under a URL's
    prefix when it names one). No action or bucket wildcard; the only `*` ends an object ARN (`b/p/*`)."""
    listed: list[str] = []
    objects: list[str] = []
    for url in buckets:
        bucket, prefix = _bucket_and_prefix(url)
        listed.append(f"arn:aws:s3:::{bucket}")
        # a prefix is a directory (its objects) or one object (a single uploaded file)
        objects += [f"arn:aws:s3:::{bucket}/{prefix}", f"arn:aws:s3:::{bucket}/{prefix}/*"] if prefix else \
            [f"arn:aws:s3:::{bucket}/*"]
    return {"Version": "2012-10-17", "Statement": [
        {"Sid": "ListTheJobsBuckets", "Effect": "Allow", "Action": ["s3:ListBucket"],
         "Resource": sorted(set(listed))},
        {"Sid": "ReadWriteTheJobsObjects", "Effect": "Allow", "Action": ["s3:GetObject", "s3:PutObject"],
         "Resource": sorted(set(objects))}]}


def bucket_instance_profile(spec: ClusterSpec, tags: dict[str, str],
                            opts: pulumi.ResourceOptions) -> pulumi.Output[str] | None:
    """A role, its bucket policy and an instance profile for this cluster's nodes (the profile's name), or None
    when the nodes touch no bucket."""
    if not spec.node_buckets:
        return None
    policy = json.dumps(bucket_policy(spec.node_buckets), sort_keys=True)
    role = aws.iam.Role(f"{spec.name}-nodes", assume_role_policy=json.dumps(EC2_TRUST, sort_keys=True),
                        description=f"Sortie cluster {spec.name}: its nodes, scoped to the job's buckets",
                        tags=tags, opts=opts)
    grant = aws.iam.RolePolicy(f"{spec.name}-buckets", role=role.id, policy=policy, opts=opts)
    # an IAM role's and an instance profile's id is their name
    profile = aws.iam.InstanceProfile(f"{spec.name}-nodes", role=role.id, tags=tags, opts=opts)
    # the nodes wait for the policy too, not only for the profile: their first bucket step needs it
    return pulumi.Output.all(profile.id, grant.id).apply(lambda done: str(done[0]))


def _first(value: object) -> str:
    """A subnet output may be one id or a list of them: the first."""
    if isinstance(value, list | tuple):
        if not value:
            raise UsageError("the network stack's subnet output is an empty list")
        return str(value[0])
    return str(value)


def _as_list(value: object) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list | tuple) else [str(value)]
