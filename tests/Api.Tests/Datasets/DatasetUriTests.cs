using FineTune.Domain.Datasets;

namespace FineTune.Api.Tests.Datasets;

public sealed class DatasetUriTests : IDisposable
{
    private readonly string _base = DatasetUri.RealPath(Directory.CreateTempSubdirectory("ds-uri-").FullName);
    private readonly string _root;
    private readonly string _outside;
    private readonly DatasetUri _resolver;

    public DatasetUriTests()
    {
        _root = Directory.CreateDirectory(Path.Combine(_base, "allowed")).FullName;
        _outside = Directory.CreateDirectory(Path.Combine(_base, "outside")).FullName;
        Directory.CreateDirectory(Path.Combine(_root, "sub"));
        File.WriteAllText(Path.Combine(_root, "sub", "train.jsonl"), "{\"text\":\"x\"}");
        File.WriteAllText(Path.Combine(_outside, "secret.jsonl"), "{\"text\":\"s\"}");
        _resolver = new DatasetUri([_root]);
    }

    public void Dispose() => Directory.Delete(_base, recursive: true);

    private string Expected => Path.Combine(_root, "sub", "train.jsonl");

    private string Fails(string reference) => Assert.Throws<DatasetUriException>(() => _resolver.Resolve(reference)).Message;

    [Fact]
    public void Absolute_path_and_file_uri_resolve()
    {
        Assert.Equal(Expected, _resolver.Resolve(Expected));
        Assert.Equal(Expected, _resolver.Resolve("file://" + Expected));
        Assert.Equal(Expected, _resolver.Resolve(new Uri(Expected).AbsoluteUri));
        Assert.Equal(Expected, _resolver.Resolve("file://localhost" + Expected));
        Assert.Equal(Expected, DatasetUri.Resolve(Expected, [_root + "/"]));
    }

    [Fact]
    public void Percent_encoded_file_uri_is_decoded()
    {
        var spaced = Path.Combine(_root, "my data.jsonl");
        File.WriteAllText(spaced, "x");
        Assert.Equal(spaced, _resolver.Resolve(new Uri(spaced).AbsoluteUri));
        Assert.Contains("%20", new Uri(spaced).AbsoluteUri);
    }

    [Fact]
    public void Dot_dot_inside_the_root_is_fine_but_escapes_are_refused()
    {
        Assert.Equal(Expected, _resolver.Resolve(Path.Combine(_root, "sub", "..", "sub", ".", "train.jsonl")));
        var escape = _root + "/../outside/secret.jsonl";
        Assert.Contains("outside the allowed dataset locations", Fails(escape));
        Assert.Contains("outside the allowed dataset locations", Fails("file://" + escape));
        Assert.Contains("outside the allowed dataset locations", Fails("/etc/passwd"));
    }

    [Fact]
    public void Root_name_prefix_is_not_a_root()
    {
        var sibling = Directory.CreateDirectory(_root + "2").FullName;
        File.WriteAllText(Path.Combine(sibling, "a.jsonl"), "x");
        Assert.Contains("outside", Fails(Path.Combine(sibling, "a.jsonl")));
    }

    [Fact]
    public void Symlink_out_of_the_root_is_refused()
    {
        var fileLink = Path.Combine(_root, "link.jsonl");
        File.CreateSymbolicLink(fileLink, Path.Combine(_outside, "secret.jsonl"));
        Assert.Contains("outside", Fails(fileLink));

        var dirLink = Path.Combine(_root, "dirlink");
        Directory.CreateSymbolicLink(dirLink, _outside);
        Assert.Contains("outside", Fails(Path.Combine(dirLink, "secret.jsonl")));

        // A relative link that climbs out.
        var relLink = Path.Combine(_root, "sub", "rel.jsonl");
        File.CreateSymbolicLink(relLink, "../../outside/secret.jsonl");
        Assert.Contains("outside", Fails(relLink));
    }

    [Fact]
    public void Dot_dot_after_a_symlink_follows_the_link_like_the_os()
    {
        // root/dirlink -> outside; root/dirlink/../allowed/sub/train.jsonl really is base/allowed/sub/train.jsonl,
        // which is inside. Lexically it would also be inside, but root/dirlink/../x must not be read as root/x.
        Directory.CreateDirectory(Path.Combine(_outside, "deep"));
        var link = Path.Combine(_root, "deeplink");
        Directory.CreateSymbolicLink(link, Path.Combine(_outside, "deep"));
        File.WriteAllText(Path.Combine(_root, "secret.jsonl"), "inside");
        // Lexically: root/secret.jsonl (inside). Physically: outside/secret.jsonl.
        Assert.Contains("outside", Fails(Path.Combine(link, "..", "secret.jsonl")));
    }

    [Fact]
    public void Symlink_inside_the_root_resolves_to_its_target()
    {
        var link = Path.Combine(_root, "alias.jsonl");
        File.CreateSymbolicLink(link, Path.Combine(_root, "sub", "train.jsonl"));
        Assert.Equal(Expected, _resolver.Resolve(link));
    }

    [Fact]
    public void Root_given_through_a_symlink_is_canonicalised()
    {
        var rootLink = Path.Combine(_base, "rootlink");
        Directory.CreateSymbolicLink(rootLink, _root);
        var viaLink = new DatasetUri([rootLink]);
        Assert.Equal(Expected, viaLink.Resolve(Path.Combine(rootLink, "sub", "train.jsonl")));
        Assert.Equal(Expected, viaLink.Resolve(Expected));
    }

    [Fact]
    public void Symlink_loop_is_an_error()
    {
        var a = Path.Combine(_root, "loop-a");
        var b = Path.Combine(_root, "loop-b");
        File.CreateSymbolicLink(a, b);
        File.CreateSymbolicLink(b, a);
        Assert.Contains("symbolic links", Fails(a));
    }

    [Fact]
    public void Not_found_and_directory_are_clear()
    {
        Assert.Contains("was not found", Fails(Path.Combine(_root, "missing.jsonl")));
        Assert.Contains("is a directory", Fails(Path.Combine(_root, "sub")));
        Assert.Contains("is a directory", Fails(_root));
    }

    [Theory]
    [InlineData("http://example.com/data.jsonl", "http:// dataset URIs are not supported in this version")]
    [InlineData("HTTPS://example.com/data.jsonl", "https:// dataset URIs are not supported in this version")]
    [InlineData("s3://bucket/key.jsonl", "unsupported dataset URI scheme \"s3\"")]
    [InlineData("hf:org/dataset", "unsupported dataset URI scheme \"hf\"")]
    [InlineData("file://server/share/x.jsonl", "file:// URIs with a host (\"server\") are not supported")]
    [InlineData("relative/path.jsonl", "must be absolute")]
    [InlineData("", "is empty")]
    [InlineData("   ", "is empty")]
    public void Bad_references_are_explained(string reference, string message)
    {
        Assert.Contains(message, Fails(reference));
    }

    [Fact]
    public void Overlong_reference_is_refused()
    {
        Assert.Contains("longer than 2048", Fails("/" + new string('a', 2048)));
    }

    [Fact]
    public void No_roots_means_nothing_is_allowed()
    {
        var e = Assert.Throws<DatasetUriException>(() => new DatasetUri([]).Resolve(Expected));
        Assert.Contains("no dataset locations are configured", e.Message);
    }

    [Fact]
    public void TryResolve_reports_without_throwing()
    {
        Assert.True(_resolver.TryResolve(Expected, out var path, out _));
        Assert.Equal(Expected, path);
        Assert.False(_resolver.TryResolve("ftp://x/y", out _, out var error));
        Assert.Contains("ftp", error);
    }
}
