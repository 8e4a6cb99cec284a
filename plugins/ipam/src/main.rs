use std::process::ExitCode;

fn main() -> ExitCode {
    virtnet_cni::skel::run(&virtnet_ipam::IpamPlugin)
}
