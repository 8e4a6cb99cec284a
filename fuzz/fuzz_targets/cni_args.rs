//! `CNI_ARGS`, parsed on its own and as part of the environment of ADD, CHECK and DEL.
#![no_main]

use libfuzzer_sys::fuzz_target;
use virtnet_cni::env::{CniArgs, Inputs, Request};
use virtnet_fuzz::accepted;

fuzz_target!(|raw: &str| {
    let args = accepted(CniArgs::parse(raw));
    for command in ["ADD", "CHECK", "DEL"] {
        let vars = [
            ("CNI_COMMAND", command),
            ("CNI_CONTAINERID", "0123456789abcdef"),
            ("CNI_NETNS", "/var/run/netns/cni-1234"),
            ("CNI_IFNAME", "eth0"),
            ("CNI_ARGS", raw),
        ];
        // The rest of the environment is valid, so the outcome is CNI_ARGS's alone.
        let from_env = accepted(Inputs::from_vars(vars)).map(|inputs| match inputs.request {
            Request::Add(attachment) | Request::Check(attachment) => attachment.args,
            Request::Del(detachment) => detachment.args,
            other => panic!("CNI_COMMAND={command} gave {other:?}"),
        });
        assert_eq!(
            args, from_env,
            "CNI_COMMAND={command} reads CNI_ARGS differently"
        );
    }
});
