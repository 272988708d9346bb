using System.Net;
using System.Net.Http.Json;
using System.Security.Cryptography;
using System.Text;
using System.Text.Json;
using FineTune.Domain.Models;
using FineTune.Domain.Remote;
using FineTune.Tests.Support;
using Microsoft.AspNetCore.Http;
using Microsoft.EntityFrameworkCore;

namespace FineTune.Api.Tests.Remote;

/// <summary>The API allowed to fetch from 127.0.0.1 only (over plain http: the test server has no certificate).</summary>
public sealed class LocalFetchApiFactory : ApiFactory
{
    protected override IEnumerable<(string Key, string Value)> Settings =>
    [
        ("Remote:AllowHttp", "true"), ("Remote:AllowedNetworks:0", "127.0.0.1/32"), ("Remote:MaxRedirects", "2"),
        ("Remote:Timeout", "00:00:02"), ("Datasets:MaxBytes", "5000"),
    ];
}

/// <summary>Datasets and models fetched from a real HTTP server on 127.0.0.1 that the test starts.</summary>
public sealed class RemoteFetchTests(LocalFetchApiFactory api) : IClassFixture<LocalFetchApiFactory>, IAsyncLifetime
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;
    private LocalHttpServer _server = null!;
    private const string Data = "{\"prompt\": \"2+2=\", \"completion\": \"4\"}\n{\"prompt\": \"3+3=\", \"completion\": \"6\"}\n";

    public async ValueTask InitializeAsync()
    {
        _server = await LocalHttpServer.StartAsync();
        _server.File("/data.jsonl", Encoding.UTF8.GetBytes(Data));
    }

    public async ValueTask DisposeAsync() => await _server.DisposeAsync();

    private async Task<HttpResponseMessage> Submit(string trainingData, string? model = null)
    {
        var client = await api.ClientAsync("remote");
        return await client.PostAsync("/v1/fine-tunes", Requests.Body(Requests.LoraWith(o =>
        {
            o["trainingData"] = trainingData;
            if (model is not null) o["model"] = model;
        })), Ct);
    }

    private async Task<string> RefusedOn(string field, HttpResponseMessage response)
    {
        var text = await response.Content.ReadAsStringAsync(Ct);
        Assert.True(response.StatusCode == HttpStatusCode.UnprocessableEntity, text);
        return JsonDocument.Parse(text).RootElement.GetProperty("errors").GetProperty(field)[0].GetString()!;
    }

    [Fact]
    public async Task A_remote_dataset_is_validated_and_its_checksum_recorded()
    {
        var response = await Submit(_server.Url("/data.jsonl"));
        Assert.True(response.StatusCode == HttpStatusCode.Accepted, await response.Content.ReadAsStringAsync(Ct));
        var job = await response.JsonAsync();
        Assert.Equal(_server.Url("/data.jsonl"), job.GetProperty("trainingData").GetString());
        var dataset = job.GetProperty("dataset");
        Assert.Equal(2, dataset.GetProperty("examples").GetInt32());
        Assert.Equal(Convert.ToHexStringLower(SHA256.HashData(Encoding.UTF8.GetBytes(Data))), dataset.GetProperty("sha256").GetString());
    }

    [Fact]
    public async Task Datasets_over_the_size_cap_are_refused_with_and_without_a_content_length()
    {
        var big = Encoding.UTF8.GetBytes(string.Concat(Enumerable.Repeat("{\"text\": \"" + new string('a', 90) + "\"}\n", 60)));
        _server.File("/big.jsonl", big);
        _server.File("/big-chunked.jsonl", big, chunked: true);
        Assert.Contains($"is {big.Length} bytes, over the limit of 5000 bytes (Datasets:MaxBytes)",
            await RefusedOn("trainingData", await Submit(_server.Url("/big.jsonl"))));
        Assert.Contains("is over the limit of 5000 bytes (Datasets:MaxBytes)",
            await RefusedOn("trainingData", await Submit(_server.Url("/big-chunked.jsonl"))));
    }

    [Fact]
    public async Task Redirects_are_followed_up_to_the_limit_and_each_hop_is_checked()
    {
        _server.Redirect("/r1", "/r2");
        _server.Redirect("/r2", "/data.jsonl");
        Assert.Equal(HttpStatusCode.Accepted, (await Submit(_server.Url("/r1"))).StatusCode);

        _server.Redirect("/r0", "/r1");
        Assert.Contains("redirected more than 2 times (Remote:MaxRedirects)", await RefusedOn("trainingData", await Submit(_server.Url("/r0"))));

        // 127.0.0.1 is allowed, 127.0.0.2 (also loopback) is not: the redirect target is checked again.
        _server.Redirect("/elsewhere", $"http://127.0.0.2:{_server.BaseUri.Port}/data.jsonl");
        Assert.Contains("resolves to 127.0.0.2, a loopback address; such addresses are refused",
            await RefusedOn("trainingData", await Submit(_server.Url("/elsewhere"))));
    }

    [Fact]
    public async Task Missing_and_slow_remote_files_are_clear_errors()
    {
        Assert.Contains("answered 404", await RefusedOn("trainingData", await Submit(_server.Url("/missing.jsonl"))));
        _server.Routes["/slow.jsonl"] = async ctx =>
        {
            await ctx.Response.WriteAsync("{\"text\": \"a\"}\n", ctx.RequestAborted);
            await ctx.Response.Body.FlushAsync(ctx.RequestAborted);
            await Task.Delay(TimeSpan.FromSeconds(30), ctx.RequestAborted);
        };
        Assert.Contains("took longer than 00:00:02 (Remote:Timeout)", await RefusedOn("trainingData", await Submit(_server.Url("/slow.jsonl"))));
    }

    [Fact]
    public async Task A_remote_model_is_registered_from_its_small_files_and_jobs_use_it_without_the_api_fetching_weights()
    {
        var folder = Path.Combine(api.StorageRoot, "served-model");
        ApiFactory.WriteTinyModel(folder);
        _server.Folder("/models/tiny", folder);
        var sha = Convert.ToHexStringLower(SHA256.HashData(File.ReadAllBytes(Path.Combine(folder, "model.safetensors"))));
        var admin = await api.ClientAsync("remote-admin");
        var uri = _server.Url("/models/tiny"); // no trailing slash: the folder URI is normalised
        var response = await admin.PostAsync("/v1/admin/base-models", JsonContent.Create(new { name = "remote-tiny", uri, sha256 = sha }), Ct);
        Assert.True(response.StatusCode == HttpStatusCode.Created, await response.Content.ReadAsStringAsync(Ct));
        var model = await response.JsonAsync();
        Assert.Equal(uri + "/", model.GetProperty("uri").GetString());
        Assert.Equal(sha, model.GetProperty("sha256").GetString());
        Assert.Equal(64, model.GetProperty("hiddenSize").GetInt32());
        Assert.Equal(JsonValueKind.Null, model.GetProperty("weightsBytes").ValueKind);

        var job = await Submit(_server.Url("/data.jsonl"), model: "remote-tiny");
        Assert.True(job.StatusCode == HttpStatusCode.Accepted, await job.Content.ReadAsStringAsync(Ct));
        var direct = await Submit(_server.Url("/data.jsonl"), model: uri + "/");
        Assert.Equal(HttpStatusCode.Accepted, direct.StatusCode);

        await using var db = api.Db();
        var id = (await job.JsonAsync()).GetProperty("id").GetGuid();
        var row = await db.Jobs.SingleAsync(j => j.Id == id, Ct);
        Assert.Equal(uri + "/", row.ModelUri);
        Assert.Equal(sha, row.ModelSha256);
        Assert.StartsWith(Path.Combine(api.StorageRoot, "model-cache"), row.ModelPath);
        Assert.True(File.Exists(Path.Combine(row.ModelPath, "config.json")));
        Assert.True(File.Exists(Path.Combine(row.ModelPath, "tokenizer.json")));
        Assert.False(File.Exists(Path.Combine(row.ModelPath, "model.safetensors")));
        Assert.Equal(0, _server.HitsOf("/models/tiny/model.safetensors"));
        Assert.Equal(1, _server.HitsOf("/models/tiny/config.json")); // cached after the first fetch
    }
}

/// <summary>With the default configuration nothing private is fetched, and plain http is refused: no server needed,
/// since the checks come before any connection.</summary>
public sealed class RemoteRefusalTests(ApiFactory api) : IClassFixture<ApiFactory>
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;

    public static TheoryData<string, string> Refused() => new()
    {
        { "http://127.0.0.1:9/data.jsonl", "plain http:// is not accepted" },
        { "https://127.0.0.1:9/data.jsonl", "resolves to 127.0.0.1, a loopback address" },
        { "https://localhost:9/data.jsonl", "a loopback address" },
        { "https://169.254.169.254/latest/meta-data", "resolves to 169.254.169.254, a link-local address" },
        { "https://10.0.0.7/data.jsonl", "a private address" },
        { "https://192.168.1.1/data.jsonl", "a private address" },
        { "https://[::1]/data.jsonl", "a loopback address" },
        { "https://[fd12::1]/data.jsonl", "a private (unique local) address" },
        { "https://[::ffff:172.16.0.1]/data.jsonl", "a private address" },
        { "https://user:secret@example.com/data.jsonl", "credentials" },
        { "ftp://example.com/data.jsonl", "unsupported dataset URI scheme \"ftp\"" },
    };

    [Theory, MemberData(nameof(Refused))]
    public async Task Private_addresses_and_insecure_schemes_are_refused_by_default(string uri, string message)
    {
        var client = await api.ClientAsync("refusal");
        var response = await client.PostAsync("/v1/fine-tunes", Requests.Body(Requests.LoraWith(o => o["trainingData"] = uri)), Ct);
        var text = await response.Content.ReadAsStringAsync(Ct);
        Assert.True(response.StatusCode == HttpStatusCode.UnprocessableEntity, text);
        var error = JsonDocument.Parse(text).RootElement.GetProperty("errors").GetProperty("trainingData")[0].GetString()!;
        Assert.Contains(message, error);
        Assert.DoesNotContain("secret", error);
    }

    [Fact]
    public async Task A_private_model_uri_is_refused_by_default()
    {
        var client = await api.ClientAsync("refusal");
        var response = await client.PostAsync("/v1/fine-tunes", Requests.Body(Requests.LoraWith(o => o["model"] = "https://127.0.0.1:9/m/")), Ct);
        Assert.Equal(HttpStatusCode.UnprocessableEntity, response.StatusCode);
        Assert.Contains("a loopback address", (await response.JsonAsync()).GetProperty("errors").GetProperty("model")[0].GetString());
    }

    [Theory]
    [InlineData("8.8.8.8", null)]
    [InlineData("2606:4700:4700::1111", null)]
    [InlineData("127.0.0.53", "a loopback address")]
    [InlineData("0.0.0.0", "a 'this network' address")]
    [InlineData("100.64.1.1", "a carrier-grade NAT address")]
    [InlineData("172.31.255.255", "a private address")]
    [InlineData("172.32.0.1", null)]
    [InlineData("224.0.0.1", "a multicast address")]
    [InlineData("255.255.255.255", "a reserved address")]
    [InlineData("fe80::1%2", "a link-local address")]
    [InlineData("::", "the unspecified address")]
    [InlineData("::ffff:10.1.1.1", "a private address")]
    [InlineData("64:ff9b::a00:1", "a NAT64 address")]
    [InlineData("2002:a00:1::", "a 6to4 address")]
    public void Address_policy(string address, string? refusal)
    {
        Assert.Equal(refusal, AddressPolicy.Refusal(IPAddress.Parse(address), []));
        // An allowed range lets exactly that range through.
        if (refusal is not null)
            Assert.Null(AddressPolicy.Refusal(IPAddress.Parse(address), [IPNetwork.Parse(IPAddress.Parse(address).IsIPv4MappedToIPv6
                ? IPAddress.Parse(address).MapToIPv4() + "/32" : address.Split('%')[0] + (address.Contains(':') ? "/128" : "/32"))]));
    }
}

/// <summary>The model cache against a real server: one download for concurrent jobs, checksums, no partial files.</summary>
public sealed class ModelCacheTests : IAsyncLifetime
{
    private static CancellationToken Ct => TestContext.Current.CancellationToken;
    private LocalHttpServer _server = null!;
    private readonly string _root = Directory.CreateTempSubdirectory("ft-cache-").FullName;
    private readonly byte[] _weights = RandomNumberGenerator.GetBytes(300_000);
    private RemoteFetcher _fetcher = null!;

    public async ValueTask InitializeAsync()
    {
        _server = await LocalHttpServer.StartAsync();
        _server.File("/m/config.json", """{"architectures": ["LlamaForCausalLM"]}"""u8.ToArray());
        _server.File("/m/tokenizer.json", "{}"u8.ToArray());
        _server.Routes["/m/model.safetensors"] = async ctx =>
        {
            await Task.Delay(200, ctx.RequestAborted); // long enough for concurrent callers to overlap
            ctx.Response.ContentLength = _weights.Length;
            await ctx.Response.Body.WriteAsync(_weights, ctx.RequestAborted);
        };
        _fetcher = new RemoteFetcher(new RemoteOptions { AllowHttp = true, AllowedNetworks = ["127.0.0.1/32"] });
    }

    public async ValueTask DisposeAsync()
    {
        _fetcher.Dispose();
        await _server.DisposeAsync();
        Directory.Delete(_root, true);
    }

    private string Sha(byte[] b) => Convert.ToHexStringLower(SHA256.HashData(b));

    [Fact]
    public async Task Concurrent_fetches_of_one_model_download_its_weights_once()
    {
        var cache = new ModelCache(_root, _fetcher);
        var uri = new Uri(_server.Url("/m/"));
        var results = await Task.WhenAll(Enumerable.Range(0, 4).Select(_ => Task.Run(() => cache.EnsureWeightsAsync(uri, Sha(_weights), Ct))));
        Assert.Equal(1, _server.HitsOf("/m/model.safetensors"));
        Assert.Equal(1, _server.HitsOf("/m/config.json"));
        Assert.All(results, r => Assert.Equal(Sha(_weights), r.Digest));
        Assert.Equal(_weights, File.ReadAllBytes(Path.Combine(results[0].Folder, "model.safetensors")));
        // A second cache instance on the same root (another process) reuses the verified copy.
        var again = await new ModelCache(_root, _fetcher).EnsureWeightsAsync(uri, null, Ct);
        Assert.Equal(Sha(_weights), again.Digest);
        Assert.Equal(1, _server.HitsOf("/m/model.safetensors"));
    }

    [Fact]
    public async Task A_checksum_mismatch_leaves_nothing_usable()
    {
        var cache = new ModelCache(_root, _fetcher);
        var uri = new Uri(_server.Url("/m/"));
        var e = await Assert.ThrowsAsync<RemoteFetchException>(() => cache.EnsureWeightsAsync(uri, new string('0', 64), Ct));
        Assert.Contains($"have sha256 {Sha(_weights)}, not the expected {new string('0', 64)}", e.Message);
        var folder = cache.FolderFor(uri);
        Assert.False(File.Exists(Path.Combine(folder, "model.safetensors")));
        Assert.False(File.Exists(Path.Combine(folder, ModelCache.WeightsMarker)));
    }

    [Fact]
    public async Task An_interrupted_download_never_becomes_a_file_and_the_size_cap_holds()
    {
        _server.File("/t/config.json", "{}"u8.ToArray());
        _server.Truncated("/t/model.safetensors", _weights[..1000], declared: _weights.Length);
        var cache = new ModelCache(_root, _fetcher);
        var uri = new Uri(_server.Url("/t/"));
        await Assert.ThrowsAsync<RemoteFetchException>(() => cache.EnsureWeightsAsync(uri, null, Ct));
        var folder = cache.FolderFor(uri);
        Assert.False(File.Exists(Path.Combine(folder, "model.safetensors")));
        Assert.Empty(Directory.EnumerateFiles(folder, "*.partial-*"));

        using var capped = new RemoteFetcher(new RemoteOptions { AllowHttp = true, AllowedNetworks = ["127.0.0.1/32"], MaxModelBytes = 100_000 });
        var e = await Assert.ThrowsAsync<RemoteFetchException>(() =>
            new ModelCache(Path.Combine(_root, "capped"), capped).EnsureWeightsAsync(new Uri(_server.Url("/m/")), null, Ct));
        Assert.Contains("over the limit of 100000 bytes (Remote:MaxModelBytes)", e.Message);
    }

    [Fact]
    public async Task Sharded_weights_are_fetched_by_their_index_and_verified_as_one_digest()
    {
        byte[] a = RandomNumberGenerator.GetBytes(1000), b = RandomNumberGenerator.GetBytes(2000);
        _server.File("/s/config.json", "{}"u8.ToArray());
        _server.File("/s/model.safetensors.index.json", """
            {"weight_map": {"x": "model-00001-of-00002.safetensors", "y": "model-00002-of-00002.safetensors"}}
            """u8.ToArray());
        _server.File("/s/model-00001-of-00002.safetensors", a);
        _server.File("/s/model-00002-of-00002.safetensors", b);
        var listing = $"{Sha(a)}  model-00001-of-00002.safetensors\n{Sha(b)}  model-00002-of-00002.safetensors\n";
        var expected = Sha(Encoding.UTF8.GetBytes(listing));
        var weights = await new ModelCache(_root, _fetcher).EnsureWeightsAsync(new Uri(_server.Url("/s/")), expected, Ct);
        Assert.Equal(expected, weights.Digest);
        Assert.Equal(3000, weights.Bytes);
        Assert.Equal(expected, WeightsDigest.Compute(weights.Folder, Ct).Digest); // the same digest as a local folder's

        _server.File("/bad/config.json", "{}"u8.ToArray());
        _server.File("/bad/model.safetensors.index.json", """{"weight_map": {"x": "../../etc/passwd"}}"""u8.ToArray());
        await Assert.ThrowsAsync<InvalidDataException>(() => new ModelCache(_root, _fetcher).EnsureMetadataAsync(new Uri(_server.Url("/bad/")), Ct));
    }
}
