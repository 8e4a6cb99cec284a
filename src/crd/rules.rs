//! CEL validation rules (`x-kubernetes-validations`) shared by the Subnet, IPPool and Endpoint
//! schemas.
//!
//! The rules use the Kubernetes CEL IP/CIDR library (`isIP`, `ip()`, `isCIDR`, `cidr()`,
//! `.containsIP()`, `.family()`, `.masked()`), available to CRD validation in Kubernetes 1.31+.
//! Rule bodies guard on the parse checks of other rules (`!isCIDR(x) || …`) so that one bad value
//! produces one clear message instead of an extra "error evaluating rule".
//!
//! The apiserver rejects a CRD whose rules' estimated worst-case cost is too high, and it
//! estimates from the declared bounds; so every string or list a rule reads has a `maxLength` or
//! `maxItems` (the `MAX_*` constants), which callers also put on the fields they validate.
//!
//! Every rule's `message` tells the user what to write instead. The apiserver prefixes it with the
//! field path, so messages do not repeat the field name unless the rule is on the parent object.

use kube::core::{Message, Rule};
use schemars::{Schema, SchemaGenerator, json_schema};

/// Longest IP address text: an IPv6 address in the IPv4-embedded form
/// (`ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255`).
pub(crate) const MAX_IP_LEN: u32 = 45;

/// Longest CIDR text: an address and `/128`.
pub(crate) const MAX_CIDR_LEN: u32 = MAX_IP_LEN + 4;

/// Longest address-range entry: two addresses and a '-'.
const MAX_RANGE_ENTRY_LEN: u32 = 2 * MAX_IP_LEN + 1;

/// Most entries in one `ips`/`excludeIPs` list. Ranges make long lists unnecessary.
const MAX_RANGE_ENTRIES: u32 = 1024;

// Range entries ("a" or "a-b") are taken apart with indexOf/substring rather than split(): the
// apiserver's cost estimator assumes split() may return one element per character, and iterating
// those (all/map) put the rules far over the per-CRD cost budget.

/// CEL for the first address of the range entry held by variable `entry` (the whole entry when
/// it is a single address).
fn range_start(entry: &str) -> String {
    format!("({entry}.contains('-') ? {entry}.substring(0, {entry}.indexOf('-')) : {entry})")
}

/// CEL for the last address of the range entry held by `entry` (the whole entry when it is a
/// single address, as indexOf then returns -1).
fn range_end(entry: &str) -> String {
    format!("{entry}.substring({entry}.indexOf('-') + 1)")
}

/// CEL for the 32-bit value of the IPv4 address text `address`, from its octets.
fn ipv4_value(address: &str) -> String {
    let octet = |index: u8| format!("int({address}.split('.')[{index}])");
    format!(
        "(({} * 256 + {}) * 256 + {}) * 256 + {}",
        octet(0),
        octet(1),
        octet(2),
        octet(3)
    )
}

/// An entry is one address, or two addresses joined by '-' (a third part or a space makes one
/// end fail to parse).
fn range_entry_syntax() -> String {
    let (start, end) = (range_start("self"), range_end("self"));
    format!("isIP({start}) && isIP({end})")
}

/// CEL has no ordering on IP values, so an IPv4 range's ends are compared as 32-bit integers
/// built from their octets. IPv6 ends cannot be converted without hex parsing, which CEL lacks:
/// their order is left to the controller.
fn ipv4_range_order() -> String {
    let (start, end) = (range_start("self"), range_end("self"));
    format!(
        "!isIP({start}) || !isIP({end}) || ip({start}).family() != 4 || ip({end}).family() != 4 \
         || {} <= {}",
        ipv4_value(&start),
        ipv4_value(&end)
    )
}

/// The value is an IP address.
pub(crate) fn ip() -> Rule {
    Rule::new("isIP(self)").message("must be an IP address such as 10.6.0.1 or fd00:6::1")
}

/// The value is a CIDR.
pub(crate) fn cidr() -> Rule {
    Rule::new("isCIDR(self)").message("must be a CIDR such as 10.6.0.0/16 or fd00:6::/64")
}

/// The CIDR names a network, not a host in it: `10.6.153.0/16` is almost certainly a typo for
/// either `10.6.0.0/16` or `10.6.153.0/24`, and guessing would hand out the wrong addresses.
pub(crate) fn network_address() -> Rule {
    Rule::new("!isCIDR(self) || cidr(self) == cidr(self).masked()")
        .message("must be a network address with the host bits zero, e.g. 10.6.0.0/16 rather than 10.6.153.0/16")
}

/// An interface address: an IP of the given family with the subnet's prefix length.
pub(crate) fn interface_address(family: u8) -> Rule {
    Rule::new(format!(
        "isCIDR(self) && cidr(self).ip().family() == {family}"
    ))
    .message(Message::Message(format!(
        "must be an IPv{family} address with its subnet prefix length, e.g. {}",
        if family == 4 {
            "10.6.153.101/16"
        } else {
            "fd00:6::101/64"
        }
    )))
}

/// An IP address of the given family (an interface's gateway).
pub(crate) fn address_of_family(family: u8) -> Rule {
    Rule::new(format!("isIP(self) && ip(self).family() == {family}"))
        .message(Message::Message(format!("must be an IPv{family} address")))
}

/// The field may not change once set.
pub(crate) fn immutable(advice: &str) -> Rule {
    Rule::new("self == oldSelf").message(Message::Message(format!("is immutable: {advice}")))
}

/// An integer field lies in `min..=max`. The rule (rather than OpenAPI minimum/maximum) carries a
/// message that says what the number means.
pub(crate) fn within(min: u32, max: u32, meaning: &str) -> Rule {
    Rule::new(format!("self >= {min} && self <= {max}")).message(Message::Message(format!(
        "must be between {min} and {max}: {meaning}"
    )))
}

/// An 802.1Q VLAN ID.
pub(crate) fn vlan_id() -> Rule {
    within(0, 4094, "a VLAN ID (0 means untagged)")
}

/// Object-level rule: the optional address field `address_field` lies inside the CIDR field
/// `cidr_field`. Reported at the address field.
pub(crate) fn address_inside(address_field: &str, cidr_field: &str) -> Rule {
    Rule::new(format!(
        "!has(self.{address_field}) || !isIP(self.{address_field}) || !isCIDR(self.{cidr_field}) \
         || cidr(self.{cidr_field}).containsIP(self.{address_field})"
    ))
    .message(Message::Message(format!(
        "{address_field} must be an address inside {cidr_field}"
    )))
    .field_path(format!(".{address_field}"))
}

/// Object-level rule: both ends of every entry of the range list `list_field` lie inside the CIDR
/// field `cidr_field` (which also makes both ends the same family). Reported at the list.
pub(crate) fn entries_inside(list_field: &str, cidr_field: &str) -> Rule {
    let inside = |address: String| {
        format!("(!isIP({address}) || cidr(self.{cidr_field}).containsIP({address}))")
    };
    Rule::new(format!(
        "!has(self.{list_field}) || !isCIDR(self.{cidr_field}) || self.{list_field}.all(entry, {} && {})",
        inside(range_start("entry")),
        inside(range_end("entry"))
    ))
    .message(Message::Message(format!(
        "every address and range end in {list_field} must lie inside {cidr_field}"
    )))
    .field_path(format!(".{list_field}"))
}

/// Schema of an address-range list such as `["10.6.153.100-10.6.153.255", "10.6.0.9"]`.
///
/// The per-entry rules sit on the array's `items`, so a failure names the entry (`spec.ips[2]`);
/// `#[x_kube(validation)]` on the field could only attach them to the whole array.
pub(crate) fn ip_range_list(_: &mut SchemaGenerator) -> Schema {
    let entry_rules = [
        Rule::new(range_entry_syntax()).message(
            "must be one IP address (10.6.153.1) or a range of two addresses joined by '-' \
             (10.6.153.100-10.6.153.255), without spaces",
        ),
        Rule::new(ipv4_range_order())
            .message("must not start after it ends: write the lower address first (10.6.153.100-10.6.153.255)"),
    ];
    json_schema!({
        "type": "array",
        "maxItems": MAX_RANGE_ENTRIES,
        "items": {
            "type": "string",
            "maxLength": MAX_RANGE_ENTRY_LEN,
            "x-kubernetes-validations": entry_rules,
        },
    })
}
