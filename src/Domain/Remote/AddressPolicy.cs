using System.Net;

namespace FineTune.Domain.Remote;

/// <summary>
/// Which IP addresses a fetch may connect to: public unicast addresses, plus the ranges an operator allowed.
/// Everything that reaches this machine, its network or a cloud metadata service is refused by default.
/// </summary>
public static class AddressPolicy
{
    private static readonly (IPNetwork Net, string What)[] NonPublic =
    [
        (IPNetwork.Parse("0.0.0.0/8"), "a 'this network' address"),
        (IPNetwork.Parse("10.0.0.0/8"), "a private address"),
        (IPNetwork.Parse("100.64.0.0/10"), "a carrier-grade NAT address"),
        (IPNetwork.Parse("127.0.0.0/8"), "a loopback address"),
        (IPNetwork.Parse("169.254.0.0/16"), "a link-local address"),
        (IPNetwork.Parse("172.16.0.0/12"), "a private address"),
        (IPNetwork.Parse("192.0.0.0/24"), "an IETF protocol address"),
        (IPNetwork.Parse("192.0.2.0/24"), "a documentation address"),
        (IPNetwork.Parse("192.168.0.0/16"), "a private address"),
        (IPNetwork.Parse("198.18.0.0/15"), "a benchmarking address"),
        (IPNetwork.Parse("198.51.100.0/24"), "a documentation address"),
        (IPNetwork.Parse("203.0.113.0/24"), "a documentation address"),
        (IPNetwork.Parse("224.0.0.0/4"), "a multicast address"),
        (IPNetwork.Parse("240.0.0.0/4"), "a reserved address"),
        (IPNetwork.Parse("::/128"), "the unspecified address"),
        (IPNetwork.Parse("::1/128"), "a loopback address"),
        (IPNetwork.Parse("64:ff9b::/96"), "a NAT64 address"),
        (IPNetwork.Parse("64:ff9b:1::/48"), "a NAT64 address"),
        (IPNetwork.Parse("100::/64"), "a discard address"),
        (IPNetwork.Parse("2001::/32"), "a Teredo address"),
        (IPNetwork.Parse("2001:db8::/32"), "a documentation address"),
        (IPNetwork.Parse("2002::/16"), "a 6to4 address"),
        (IPNetwork.Parse("fc00::/7"), "a private (unique local) address"),
        (IPNetwork.Parse("fe80::/10"), "a link-local address"),
        (IPNetwork.Parse("ff00::/8"), "a multicast address"),
    ];

    /// <summary>Why <paramref name="address"/> may not be fetched from, or null when it may.</summary>
    public static string? Refusal(IPAddress address, IReadOnlyList<IPNetwork> allowed)
    {
        // ::ffff:10.0.0.1 reaches 10.0.0.1: judge the IPv4 address it carries.
        if (address.IsIPv4MappedToIPv6) address = address.MapToIPv4();
        if (address.AddressFamily == System.Net.Sockets.AddressFamily.InterNetworkV6 && address.ScopeId != 0)
            address = new IPAddress(address.GetAddressBytes());
        foreach (var (net, what) in NonPublic)
            if (net.Contains(address))
                return allowed.Any(a => a.Contains(address)) ? null : what;
        return null;
    }

    public static bool IsPublic(IPAddress address) => Refusal(address, []) is null;
}
